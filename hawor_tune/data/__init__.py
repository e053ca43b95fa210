"""Datasets: the ARCTIC reader, the synthetic ARCTIC-layout generator and the frame cache."""
