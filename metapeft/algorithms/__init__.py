"""Meta-learning algorithms as pure functions over parameter trees.

They share one vocabulary (see ``base``): ``meta_parameters`` (what the outer loop learns), ``task_start`` /
``inner_step`` / ``adapt`` (the task-specific update), ``meta_value_and_grad`` (the outer objective's gradient over
a batch of tasks) and ``make_optimizer`` (the outer update rule). An algorithm never knows which task or PEFT method
it runs on: it sees the adapted tree, the frozen tree and an ``Objective`` (loss, features, number of classes).
"""
