-- Station journal, schema version 7: the audit log is also a Merkle tree (RFC 6962) whose leaves
-- are the entries' chain hashes, so that a checkpoint is a transparency-log tree head. The row
-- keeps the tree's right edge (one subtree head per set bit of `size`, largest first), so the
-- head stays current in O(log n) per entry. A log written before this version is read once to
-- build it.
CREATE TABLE audit_tree (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    size      INTEGER NOT NULL,
    frontier  BLOB NOT NULL
);
