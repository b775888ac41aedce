"""Example jobs that use ckptio the way users do: torchrun training with resume, and evaluation."""
