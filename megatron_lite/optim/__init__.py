from megatron_lite.optim.optimizer import DistributedOptimizer, OptimizerConfig, build_optimizer

__all__ = ["DistributedOptimizer", "OptimizerConfig", "build_optimizer"]
