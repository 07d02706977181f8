"""The feature browser: `train-sae features` reads a sweep's store once, keeps every member's top
activating examples, quantile samples, density and histogram per latent, and writes a static site
(build.py has the steps; site.py the files)."""
