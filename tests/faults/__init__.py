"""The faults sftkit survives, one file a kind; each test fails on a sftkit without the defence.

* ``test_output_folder.py`` — two runs into one folder, a folder sftkit did not make, a user's own
  files beside the shards, a killed run's leftovers, a full disk, no permission, read-only.
* ``test_records.py`` — a 100,000-bracket line, deep nesting in JSON text, Parquet rows and
  arrays, a 50 MB line (bounded memory), gzip and zstd bombs, progress on compressed input.
* ``test_rendering.py`` — a chat template that loops, floods its output, or fails every row.
* ``test_exit_codes.py`` — exit codes a script can rely on (nothing kept, SIGTERM, bad options)
  and one sentence instead of a traceback for every expected failure.
* ``test_integrity.py`` — a shard altered or missing after prepare, a damaged manifest.
"""
