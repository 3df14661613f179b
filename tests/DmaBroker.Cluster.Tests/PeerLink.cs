using System.Net;
using System.Net.Sockets;
using System.Text;

namespace DmaBroker.Cluster.Tests;

/// <summary>
/// The way into one etcd member's peer port: every other member reaches it through here (it is the
/// member's advertised peer URL), so a test can partition members. etcd's raft transport sends each
/// request with <c>X-Server-From: &lt;member id&gt;</c>, and each member both dials the others (to
/// receive their messages, and to post its own), so a member is cut off only when every link refuses
/// the connections it dials and its own link refuses everyone's (<see cref="EtcdCluster.Isolate"/>).
/// </summary>
public sealed class PeerLink : IAsyncDisposable
{
    private const int MaxHeader = 64 * 1024;
    private readonly TcpListener _listener = new(IPAddress.Loopback, 0);
    private readonly Uri _target;
    private readonly List<(TcpClient Client, string? From)> _connections = [];
    private readonly CancellationTokenSource _stop = new();
    private readonly Task _accept;
    // Refused: everyone (all), or the connections of one member (from).
    private volatile bool _all;
    private volatile string? _from;

    public PeerLink(Uri target)
    {
        _target = target;
        _listener.Start();
        Endpoint = new Uri($"http://127.0.0.1:{((IPEndPoint)_listener.LocalEndpoint).Port}");
        _accept = AcceptAsync();
    }

    /// <summary>The member's peer URL as the others know it.</summary>
    public Uri Endpoint { get; }

    /// <summary>Refuses the connections member <paramref name="from"/> dials (null: everyone's), and closes the ones open.</summary>
    public void Block(string? from)
    {
        (_all, _from) = (from is null, from);
        lock (_connections)
        {
            foreach (var c in _connections.Where(c => Refused(c.From)).ToList())
            {
                c.Client.Dispose();
                _connections.Remove(c);
            }
        }
    }

    /// <summary>Lets every connection through again.</summary>
    public void Unblock() => (_all, _from) = (false, null);

    private bool Refused(string? from) => _all || (from is not null && from == _from);

    private async Task AcceptAsync()
    {
        try
        {
            while (!_stop.IsCancellationRequested)
                _ = ServeAsync(await _listener.AcceptTcpClientAsync(_stop.Token));
        }
        catch (Exception e) when (e is OperationCanceledException or SocketException or ObjectDisposedException)
        {
        }
    }

    private async Task ServeAsync(TcpClient inbound)
    {
        var outbound = new TcpClient();
        try
        {
            // The first request's header says which member dialed; Go keeps a connection to one member's own.
            var header = new MemoryStream();
            var buffer = new byte[16 * 1024];
            var stream = inbound.GetStream();
            while (header.Length < MaxHeader && !HeaderEnds(header))
            {
                var read = await stream.ReadAsync(buffer, _stop.Token);
                if (read == 0)
                    throw new IOException("closed before its header");
                header.Write(buffer, 0, read);
            }
            var from = FromOf(Encoding.ASCII.GetString(header.GetBuffer(), 0, (int)header.Length));
            lock (_connections)
            {
                if (Refused(from))
                    throw new IOException("refused");
                _connections.Add((inbound, from));
                _connections.Add((outbound, from));
            }
            await outbound.ConnectAsync(_target.Host, _target.Port, _stop.Token);
            var target = outbound.GetStream();
            await target.WriteAsync(header.GetBuffer().AsMemory(0, (int)header.Length), _stop.Token);
            await Task.WhenAll(PumpAsync(stream, target), PumpAsync(target, stream));
        }
        catch (Exception e) when (e is OperationCanceledException or IOException or SocketException or ObjectDisposedException)
        {
        }
        finally
        {
            inbound.Dispose();
            outbound.Dispose();
            lock (_connections)
                _connections.RemoveAll(c => c.Client == inbound || c.Client == outbound);
        }
    }

    private static bool HeaderEnds(MemoryStream header) =>
        header.Length >= 4 && Encoding.ASCII.GetString(header.GetBuffer(), 0, (int)header.Length).Contains("\r\n\r\n", StringComparison.Ordinal);

    private static string? FromOf(string header)
    {
        foreach (var line in header.Split("\r\n"))
        {
            if (line.StartsWith("X-Server-From:", StringComparison.OrdinalIgnoreCase))
                return line["X-Server-From:".Length..].Trim();
        }
        return null;
    }

    private async Task PumpAsync(NetworkStream from, NetworkStream to)
    {
        try
        {
            await from.CopyToAsync(to, _stop.Token);
        }
        finally
        {
            from.Dispose();
            to.Dispose();
        }
    }

    public async ValueTask DisposeAsync()
    {
        await _stop.CancelAsync();
        _listener.Stop();
        await _accept;
        lock (_connections)
        {
            foreach (var c in _connections)
                c.Client.Dispose();
            _connections.Clear();
        }
        _stop.Dispose();
    }
}
