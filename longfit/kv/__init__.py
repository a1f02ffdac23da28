"""longfit.kv"""
