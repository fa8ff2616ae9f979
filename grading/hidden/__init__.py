"""Hidden checks, one module per chapter: never shipped to students, never visible in the grading sandbox."""
