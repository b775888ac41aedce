"""Side-by-side checkpoint benchmarks: pickle (torch.save/load), safetensors, DCP and ckptio."""
