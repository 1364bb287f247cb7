"""Source adapters: each turns one input format into `Candidate` records.

An adapter never decodes images or validates text (that is `data_prep.build`'s job);
it only finds pairs, and reports the items it could not pair as candidates with a
`problem` so they land in the reject list instead of vanishing.
"""
