-- The PID namespace a worker runs in (`readlink /proc/self/ns/pid`). With the host name it
-- says whether another worker can see this one's process: a worker whose process is gone
-- from a namespace another worker shares is dead for certain, and is settled at once
-- instead of after a lease TTL of silence (a worker restarted by its supervisor cleans up
-- after its previous incarnation when it starts).
alter table workers add column pid_ns text;
