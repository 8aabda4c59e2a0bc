"""The files connector: a local directory served over HTTP as a service (`files:`).

paths.py decides what a call may reach (parsed names, opened beneath the root
with O_NOFOLLOW one at a time); conditions.py holds ETags, preconditions and
ranges; pool.py the threads all file I/O runs on; service.py answers the calls.
See docs/files.md.
"""
