"""Moved to :mod:`lowrankopt.formats.tt_product` (the δ-product node serves every TT-matrix linearization, not only
the layer); this name stays importable."""

from ...formats.tt_product import delta_product_cost, tt_delta_product

__all__ = ["delta_product_cost", "tt_delta_product"]
