"""Test setup: eight CPU devices, set before jax is first imported."""

import os

os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import jax  # noqa: E402

jax.config.update('jax_platforms', 'cpu')
