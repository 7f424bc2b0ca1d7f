"""Drop-in names for users of other data-loading libraries."""
