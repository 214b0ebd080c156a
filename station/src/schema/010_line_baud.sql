-- Station journal, schema version 10: the fastest line's speed when the batch opened, so that
-- the evidence report made from a copied journal alone knows the theoretical minimum cycle time
-- (the firmware image's wire time). Batches opened before this version have none.
ALTER TABLE batches ADD COLUMN line_baud INTEGER CHECK (line_baud IS NULL OR line_baud > 0);
