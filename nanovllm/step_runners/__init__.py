"""Step runners: faster ways to run a whole step than the model's forward, side by side. The backend offers one
(`ops.active.step_runner`), and the model runner gives it the steps it covers: CUDA graphs replayed on the GPU
(cuda_graphs.py), the fused C decode step on the CPU (cpu_decode_step.py)."""
