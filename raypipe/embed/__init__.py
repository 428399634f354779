"""The embedding stage: frame / audio / text encoder actors and the Ray Data pipeline that drives them."""
