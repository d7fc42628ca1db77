"""Labels files and their join to predictions, one job per module.

A labels file is a CSV with a key column (``path``, ``sop_instance_uid`` or
``study_instance_uid``, as in the predictions CSV) and a label column holding class
names or hierarchical findings (``Pneumonia/Viral/COVID-19``). Labels are mapped to
the classes of each model's task with :meth:`pneumobatch.core.tasks.Task.map_label`.

- :mod:`.reading`: :func:`~.reading.read_labels` (encodings, separators, clear errors);
- :mod:`.keys`: the key columns, their normalisation and detection, path suffix matching;
- :mod:`.cards`: a model's card from run.json or, for older files, from the CSV itself;
- :mod:`.join`: :func:`~.join.join_labels` and :func:`~.join.study_level`, with every
  join problem counted in a :class:`~.join.JoinResult`.

Names are imported from the module that defines them; this package re-exports nothing.
"""
