"""A ``flamingo`` model for lmms-eval, registered through its plugin mechanism (no fork).

``LMMS_EVAL_PLUGINS=flamingo_pytorch.evaluation.lmms_eval_plugin python -m lmms_eval --model flamingo
--model_args checkpoint=...,lm=...,vision=... --tasks ...`` evaluates a Flamingo on lmms-eval's tasks
(docs/evaluation.md, "lmms-eval"). lmms-eval reads the plugin's ``models`` package (``AVAILABLE_MODELS``
and the class in ``models.flamingo``) and adds its ``tasks`` folder to the task search path.
"""
