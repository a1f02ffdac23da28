"""longfit.bench"""
