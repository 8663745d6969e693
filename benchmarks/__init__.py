"""Benchmarks for kvos: workloads, peers and the machine's roofline.

Benchmark-only peers (llama-cpp-python, Hugging Face transformers) are imported
inside the functions that use them, so nothing here becomes a kvos dependency.
"""
