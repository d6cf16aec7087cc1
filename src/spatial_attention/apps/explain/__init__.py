"""Maps of trained models: ``spatial-attention viz --run`` / ``--weights``, and the gallery.

``runs.py`` loads a trained model from a training run, an equal-budget benchmark run or
a weights file; ``cli.py`` draws its maps on the user's images; ``gallery.py`` writes the
docs gallery (one panel per mechanism of the benchmark's runs on the same test images).
"""
