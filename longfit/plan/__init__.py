"""longfit.plan"""
