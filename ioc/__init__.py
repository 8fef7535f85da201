"""ptychostream.ioc"""
