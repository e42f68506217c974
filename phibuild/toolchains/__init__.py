"""Toolchains: each backend's software in an environment of its own, made from a committed, hashed lock and run
as a worker process, so that toolchains whose requirements conflict live side by side and doit's process never
imports one. ``declare`` says what each toolchain is, ``lock`` resolves its locks, ``environment`` makes and
removes environments, ``worker`` runs a job in one; ``phibuild.work`` is the worker's side."""
