"""Data sets. Each option of the ``dataset`` config group is a ``_target_`` builder function that
returns a :class:`kdrun.data.base.DataModule`."""
