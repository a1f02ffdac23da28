"""longfit.spec_decode"""
