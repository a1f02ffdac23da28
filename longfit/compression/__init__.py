"""longfit.compression"""
