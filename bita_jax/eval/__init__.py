"""The eval layer: BiTA measured against plain greedy and against HF transformers.

Modules: `tree_select` (acceptance statistics and the tree that is fastest on this hardware),
`bench` (BiTA vs our greedy, side by side), `report` (the speed report with the HF baselines),
`plots` (its figures), `step_cost` (a step's cost against its tokens), `context_bench` (speed
against prompt length) and `precision` (BiTA against greedy in each precision). Import the
modules themselves: `from bita_jax.eval import bench`.
"""
