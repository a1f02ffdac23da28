"""longfit.eval"""
