"""longfit.engine"""
