"""protocols/library"""
