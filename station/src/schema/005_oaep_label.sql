-- Station journal, schema version 5: the RSA-OAEP label the batch transport key was wrapped
-- with for the customer. On a token that takes OAEP labels it is the batch's work order, so the
-- wrapped key opens only as the key of that work order (a utility that unwraps it under another
-- batch's name gets an error, not a key); NULL where the token refuses labels (SoftHSM 2.6.1),
-- and for batches opened before labels were used. Fixed when the batch opens.
ALTER TABLE batches ADD COLUMN oaep_label TEXT CHECK (oaep_label IS NULL OR length(oaep_label) BETWEEN 1 AND 64);
