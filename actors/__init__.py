"""The Ray runtime: thin actor shells around library objects, the GPU-allocated training
task, and the federation driver that runs the round loop. Only this package imports Ray."""
