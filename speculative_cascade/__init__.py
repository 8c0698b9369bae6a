"""speculative_cascade"""
