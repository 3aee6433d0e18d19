"""A whole run, in small modules: `loop` (prepare, train, summarise), `workdir`
(metrics, plots, TensorBoard, resume), `validate` (config checks), `progress`."""
