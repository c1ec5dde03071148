"""The eval layer: BiTA measured against plain greedy and against HF transformers.

Modules: `tree_select` (acceptance statistics and the tree that is fastest on this hardware),
`bench` (BiTA vs our greedy, side by side), `report` (the speed report with the HF baselines)
and `plots` (its figures). Import the modules themselves: `from bita_jax.eval import bench`.
"""
