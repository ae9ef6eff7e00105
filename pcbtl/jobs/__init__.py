"""Jobs: the built-in demo (:mod:`~pcbtl.jobs.demo`), the simulation study
(:mod:`~pcbtl.jobs.study`) and the batch runner (:mod:`~pcbtl.jobs.batch`), with the atomic
file writing they share."""
