"""Order books: L2 depth per venue, kept in sync with the venue's own update sequence
or checksum, so a book is either exact to its depth or known to need a resync."""
