"""ptychostream.bluesky_plans"""
