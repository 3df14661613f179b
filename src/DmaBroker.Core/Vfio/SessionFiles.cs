using DmaBroker.Core.Sessions;

namespace DmaBroker.Core.Vfio;

/// <summary>
/// One session's VFIO files, as a process's container and device fds: its containers and its
/// open device handles, each by id. Kept by the VFIO driver rather than by the session, so a
/// session knows nothing of VFIO; guarded by the session's state lock (<c>docs/locking.md</c>).
/// </summary>
internal sealed class SessionFiles(Session session)
{
    public IdTable<Container> Containers { get; } =
        new(session.Sync, c => ErrnoException.NotFound(Errno.ENOENT, $"container {c} is not a container of session {session.Id}"));

    /// <summary>An unknown handle is EBADF (NOT_FOUND), like a closed fd.</summary>
    public IdTable<DeviceHandle> Handles { get; } =
        new(session.Sync, h => ErrnoException.NotFound(Errno.EBADF, $"device handle {h} is not open in session {session.Id}"));

    /// <summary>A table of objects by id, like a file table.</summary>
    public sealed class IdTable<T>(Lock sync, Func<ulong, ErrnoException> missing)
        where T : class
    {
        private readonly Dictionary<ulong, T> _items = [];

        /// <summary>How many items the table holds.</summary>
        public int Count
        {
            get
            {
                lock (sync)
                    return _items.Count;
            }
        }

        public void Add(ulong id, T item)
        {
            lock (sync)
                _items.Add(id, item);
        }

        public T Find(ulong id)
        {
            lock (sync)
                return _items.TryGetValue(id, out var item) ? item : throw missing(id);
        }

        public void Remove(ulong id)
        {
            lock (sync)
                _items.Remove(id);
        }

        public T[] Snapshot()
        {
            lock (sync)
                return [.. _items.Values];
        }
    }
}
