"""Recovery of a degraded model: the library behind the train and export stages.

``methods`` (the registry of recovery methods) builds a ``recovery_model`` from a ``job``
(plain data, with the ``batching`` of its samples); ``task`` trains or saves it under the
``losses``; ``masked_lora`` keeps LoRA under the sparsity mask; ``layer_ranking`` picks the
LoRA layers; ``inits``, ``training_free``, ``closed_form`` and ``eora`` fit the training-free
methods and starts; ``config`` holds the train stage's part settings.
"""
