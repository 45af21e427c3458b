# batch.pyx defines one Python-level function (l1_results) and nothing to cimport: this
# file keeps the module's shape like the others' (.pyx + .pxd + .pyi).
