"""Materials: data loaders (:mod:`~pcbtl.materials.data`), composition and structure features
(:mod:`~pcbtl.materials.features`) and the band-gap application
(:mod:`~pcbtl.materials.bandgap`)."""
