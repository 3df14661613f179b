using System.Text.RegularExpressions;
using DmaBroker.Core;

namespace DmaBroker.Cluster;

/// <summary>How a replica joins a cluster on etcd (SPEC §16: <c>--cluster etcd --etcd-endpoints … --replica …</c>).</summary>
public sealed partial record EtcdStoreOptions
{
    /// <summary>The etcd members' client URLs (http://host:port); calls go to any of them.</summary>
    public required IReadOnlyList<Uri> Endpoints { get; init; }

    /// <summary>This replica's name, unique in the cluster: 1–63 of a–z, 0–9, '.', '_', '-'.</summary>
    public required string Replica { get; init; }

    /// <summary>
    /// The TTL of each session's etcd lease: the broker's session lease (SPEC §5, default 3 s),
    /// rounded up to whole seconds as etcd counts them.
    /// </summary>
    public TimeSpan LeaseTtl { get; init; } = TimeSpan.FromSeconds(3);

    /// <summary>How long one etcd call may take before a claim fails EAGAIN (a release is left to the lease).</summary>
    public TimeSpan CallTimeout { get; init; } = TimeSpan.FromSeconds(2);

    /// <summary>The lease's TTL as etcd is asked for it: whole seconds, at least 1.</summary>
    internal long TtlSeconds => Math.Max(1, (long)Math.Ceiling(LeaseTtl.TotalSeconds));

    /// <summary>Checks the options; EINVAL naming the bad one.</summary>
    public void Validate()
    {
        if (!ReplicaName().IsMatch(Replica))
            throw ErrnoException.Invalid($"replica name {ErrnoException.Quote(Replica)} must be 1-63 of a-z, 0-9, '.', '_', '-', starting with a letter or digit");
        if (Endpoints.Count == 0)
            throw ErrnoException.Invalid("at least one etcd endpoint is needed");
        foreach (var e in Endpoints)
        {
            if (!e.IsAbsoluteUri || e.Scheme != Uri.UriSchemeHttp || e.AbsolutePath != "/")
                throw ErrnoException.Invalid($"etcd endpoint {ErrnoException.Quote(e.ToString())} must be http://host:port");
        }
        if (LeaseTtl <= TimeSpan.Zero || CallTimeout <= TimeSpan.Zero)
            throw ErrnoException.Invalid("the lease TTL and the call timeout must be positive");
    }

    [GeneratedRegex("^[a-z0-9][a-z0-9._-]{0,62}$")]
    private static partial Regex ReplicaName();
}
