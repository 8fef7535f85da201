"""ptychostream.hpc"""
