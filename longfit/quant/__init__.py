"""longfit.quant"""
