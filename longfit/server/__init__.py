"""longfit.server"""
