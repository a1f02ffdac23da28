"""longfit.runtime"""
