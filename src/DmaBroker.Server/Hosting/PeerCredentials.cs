using System.Net.Sockets;
using System.Runtime.InteropServices;

namespace DmaBroker.Server.Hosting;

/// <summary>The process on the other end of a Unix domain socket, as the kernel vouches for it (SO_PEERCRED).</summary>
internal readonly record struct PeerCredentials(int Pid, uint Uid, uint Gid)
{
    private const int SolSocket = 1;
    private const int SoPeerCred = 17;

    /// <summary>Reads <c>struct ucred</c> of a connected Unix socket; null where the platform has none.</summary>
    public static PeerCredentials? Of(Socket socket)
    {
        if (!OperatingSystem.IsLinux() || socket.AddressFamily != AddressFamily.Unix)
            return null;
        Span<byte> ucred = stackalloc byte[12];
        try
        {
            var length = socket.GetRawSocketOption(SolSocket, SoPeerCred, ucred);
            if (length < 12)
                return null;
        }
        catch (SocketException)
        {
            return null;
        }
        var fields = MemoryMarshal.Cast<byte, int>(ucred);
        return new PeerCredentials(fields[0], (uint)fields[1], (uint)fields[2]);
    }
}
