"""The embedding stage: frame / audio / text encoder actors, the Ray Data pipeline that drives them, and the
WBDC / YouTube-8M feature importers (they run the text encoder, so they belong to the stage, not to io)."""
