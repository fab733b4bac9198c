"""lm2's data pipeline (`lm2 prepare`, SPEC §4): readers → standardize → classify → rules → dedup → safety →
quality, orchestrated by `pipeline.run_prepare`. Later stages read the artefact with
`pipeline.iter_kept(ws.prepared)`."""
