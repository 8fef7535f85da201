"""ptychostream.plugins"""
